"""Request and response bodies of the v1 API (``PRODUCT.md`` is the contract; field names are exact), one
module per resource as the routes are: :mod:`.act`, :mod:`.sessions`, :mod:`.models`, and :mod:`.common`
(strict requests, counters, the error body).
"""
