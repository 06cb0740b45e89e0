"""PyTorch port of DVIS-DAQ offline (the eager baseline and parity oracle)."""
