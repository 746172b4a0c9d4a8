"""The guide's applications (SPEC §5), each a package over r1kit's own stack: ``support``, the
customer-service assistant. Apps sit above ``serve``: they may mount routes on its app and drive its
engine, and nothing below imports them."""
