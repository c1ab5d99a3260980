"""Text to token ids and back, in the checkpoint's own chat format.

``tokenizer`` (``Tokenizer`` over HF ``tokenizers``: load, encode / decode, stop ids, BPE training),
``chat_template`` + ``jinja_sandbox`` (the checkpoint's Jinja template rendered as transformers renders
it, in a bounded sandbox), ``control_text`` (untrusted text never becomes control tokens),
``pretokenize`` (Llama-3's pre-tokenizer), ``gguf_file`` + ``gguf_vocab`` (a tokenizer read from a
``.gguf`` file's metadata), ``errors``. The thinking tokens themselves belong to ``thinking.tokens``.
"""
