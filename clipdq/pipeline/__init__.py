"""The audit wired together: batches fetched and embedded once, shards, cross-fitting, matching
(no prefect: the flows map these calls onto task runners).

Vocabulary: ``rows`` are catalog rows as a polars frame and ``row_count`` how many there are;
``row_batches`` an iterable of such frames; a row's ``sha256`` is the digest of its image's bytes and
its ``signature`` the image's 32 x 32 pixel signature (``io.images.signature``); ``Scored`` is a
catalog scored and not yet published; ``AuditInputs`` what one audit's steps share.
"""
