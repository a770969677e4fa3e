"""canao.latency"""
