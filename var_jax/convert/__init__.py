"""Reference (PyTorch) weights <-> var-jax: the safe .pth reader/writer (torch_io), key
mapping (mapping, naming), config inference (infer), and the whole conversion
(reference: `load_reference`, `save_reference`)."""
from var_jax.convert.reference import (Reference, as_config, load_reference, save_reference,
                                       state_dicts)

__all__ = ['Reference', 'as_config', 'load_reference', 'save_reference', 'state_dicts']
