"""canao.compiler"""
