"""What every layer may use: single flight and bounded LRUs, the rule for names, `ObjectRef`, the
process's descriptors and memory budget. Depends on nothing of zarrfs but `config` and `errors`.
"""
