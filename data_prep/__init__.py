"""Tools that turn data into the HDF5 dataset format and read it back (see data_prep/README.md)."""
