"""Label assignment: AlignOTA (``ota``: dynamic-k matching + ``build_targets``), its cost terms
(``cost``) and the Sinkhorn variant (``sinkhorn``). Batched, static shapes, jit-compatible."""
