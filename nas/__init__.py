"""canao.nas"""
