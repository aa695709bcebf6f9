"""Reading and writing: storage (the one place that knows local from ``s3://``), confined image
sources, the catalog, image decoding and the embedding cache (no torch, no prefect).

Vocabulary: a ``uri`` is a local path or an ``s3://`` URI; a ``ref`` is a catalog's image cell (a
path, URI, URL or bytes); ``access`` (``ImageAccess``) says where images may be read from;
``pixel_spec`` (``PixelSpec``) how pixels are prepared for a model; an image's ``signature`` is its
32 x 32 pixel signature, and a listing's ``listing_digest`` a hash of the files under a prefix.
"""
