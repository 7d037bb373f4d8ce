from dkit.cli import main

main()
