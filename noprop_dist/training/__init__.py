"""Training units, with no Ray in it: the unit loop (``runner``), what the trainers share
around it (``common``), the W_embed owner (``embedding_sync``) and the memory preflight."""
