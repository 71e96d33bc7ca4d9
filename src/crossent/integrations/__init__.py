"""Integrations with other libraries, behind their public modules.

``hf_families``, ``hf_forward`` and ``hf_patch`` implement :mod:`crossent.transformers` (Hugging Face
transformers): what each family does to its logits, the patched training forward, and
``patch`` / ``unpatch`` / ``is_patched`` with the checks they make. Import them through
:mod:`crossent.transformers`; transformers itself is imported only inside their functions.
"""
