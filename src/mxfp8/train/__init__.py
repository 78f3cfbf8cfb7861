"""mxfp8.train"""
