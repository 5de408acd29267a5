"""The compiler: capture, the pass infrastructure, instruments and the default pipeline."""
