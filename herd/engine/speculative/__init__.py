"""Speculative decoding: draft tokens proposed cheaply, verified by the target model in one forward, kept only as
far as the target agrees, so the output is exactly the target's (herd.engine.speculative.verify).

Proposers: prompt lookup (ngram, no model) and EAGLE-3 draft heads (eagle3, fed the target's hidden states).
"""
