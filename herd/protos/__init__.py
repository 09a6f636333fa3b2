"""Code generated from protos/ by `make`; never edited by hand."""
