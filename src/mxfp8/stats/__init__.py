"""mxfp8.stats"""
