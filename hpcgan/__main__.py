from hpcgan.cli import entry

entry()
