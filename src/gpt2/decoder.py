"""`gpt2.decoder`: the decoding core's public names under the path they have always had (an alias of
`gpt2.decode`, kept so that `from gpt2.decoder import Decoder` keeps working)."""

from gpt2.decode import *  # noqa: F403
from gpt2.decode import __all__  # noqa: F401
