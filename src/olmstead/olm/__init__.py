"""Thin wrappers over vodozemac: the account, canonical JSON and signatures.

Nothing here touches the store or the network; callers decide when state is saved.
"""
