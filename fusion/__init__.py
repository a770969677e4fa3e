"""canao.fusion"""
