"""The lifecycle brain of sparkgate: which engines run, when they start, and when they stop.

Free of HTTP-framework imports so it can be served separately later.
"""
