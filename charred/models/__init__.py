"""charred.models: the networks, the diffusion objective's pieces and sampling; weights in
any supported format through `charred.models.load_pretrained(path)`."""


def __getattr__(name):
  # Lazy: importing one network must not import the converters (and their file formats).
  if name == 'load_pretrained':
    from charred.models.pretrained import load_pretrained  # pylint: disable=g-import-not-at-top
    return load_pretrained
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
