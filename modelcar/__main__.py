from modelcar.cli import main

main()
