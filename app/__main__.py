from app.cli import cli_main

cli_main()
