"""clipdq: check product catalogs against their own images."""
