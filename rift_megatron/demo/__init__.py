"""`rift demo`: the toy end-to-end job (synthetic task, local tokenizer, SFT warm-up, rft / rift /
naive online over several seeds, held-out table, plot, exported model). See pipeline.py."""
