"""mxfp8.numerics"""
