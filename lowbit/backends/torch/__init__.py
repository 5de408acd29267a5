"""target="torch": the lowered fake-quant graph run by PyTorch; the numerical oracle of every backend."""
