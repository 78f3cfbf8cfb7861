"""mxfp8.layers"""
