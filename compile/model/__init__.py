"""Co-DINO modules, one concept per file; `codino.CoDino` assembles them."""
