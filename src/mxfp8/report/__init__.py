"""mxfp8.report"""
