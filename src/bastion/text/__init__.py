"""Text models: tokenizers, embeddings and token generation, worker side.

- ``tokenizer``: a Hugging Face ``tokenizers`` JSON, loaded with a size limit and a parse check;
  encode, decode, batch encode with padding and truncation.
- ``config``: the embedding and generation configs a text version carries (JSON, validated).
- ``chat``: chat templates with a pinned-system-prompt slot, rendered to token ids so that a
  client's text can never forge a role marker.
- ``session``: an onnxruntime CPU session for a text model's bytes.
- ``embedding``: an encoder session over a batch of texts, mean-pooled and L2-normalised.
- ``generation``: the decode loop over a decoder-with-past session (a KV cache), greedy or top-p,
  seeded, streaming, cancellable; ``batching`` steps several generations in one call.

Nothing here imports the gateway, the worker or the control plane, and only ``session`` imports
onnxruntime (``embedding`` and ``generation`` take a session object): the gateway may count prompt
tokens and check a request's context with ``tokenizer``, ``config``, ``chat`` and
``generation.check_prompt``.
"""
