"""``gptkit bench``: ``train`` (training tokens/s and MFU, generation tokens/s), ``generate``
(against Hugging Face ``generate`` and the server) and ``plain_gpt`` (the single-file
baseline GPT)."""
