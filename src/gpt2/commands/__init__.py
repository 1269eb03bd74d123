"""The commands of `gpt2 <command>`: thin modules (a typed config and its `run`) on top of the library, listed by
`gpt2.cli`. Nothing in the library imports them."""
