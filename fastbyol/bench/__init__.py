"""`python -m fastbyol.bench`: see __main__.py; record-keeping in record.py, one module per subcommand."""
