"""The `forced-align` command line (entry point: aligner_client.cli.main:main)."""
