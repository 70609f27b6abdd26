"""kvfs.tools: the operator's commands (`kvfs SUBCOMMAND`), one module each, each with
`main(argv=None) -> int`. Installed as the package kvfs.tools (see pyproject.toml); the
engine in kvfs/ never imports it."""
