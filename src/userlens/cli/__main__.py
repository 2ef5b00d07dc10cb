from userlens.cli import main

main()
