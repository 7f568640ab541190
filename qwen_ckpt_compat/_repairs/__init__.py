"""Repairs: what old remote code relies on that transformers removed or changed since, with the old semantics.

Each repair goes on the remote-code classes of a loaded model (never on transformers' own classes), and only
where the class needs it, which is found by looking at the classes (never at the transformers version). Every
install goes through the patch registry (:mod:`qwen_ckpt_compat._patches`, group ``("repairs",)``), is
idempotent, and stays for the life of the class. One module per thing mended:

* :mod:`.model_api`: methods removed from ``PreTrainedModel`` (``get_head_mask``), ``post_init()`` that loading
  depends on, the auto class ``save_pretrained`` needs;
* :mod:`.generation`: ``GenerationMixin`` as a base, legacy tuple caches, the cache's keyword, the position ids
  of the tokens fed;
* :mod:`.weights`: loaded weights left alone, tensors computed in ``__init__`` given their values after loading;
* :mod:`.config`: the attributes ``PretrainedConfig`` carried before 5.0;
* :mod:`.streaming`: Qwen-style code whose streaming package cannot import.

:func:`qwen_ckpt_compat._preparation.restore_removed_apis` applies the first three kinds to a model class.
"""

