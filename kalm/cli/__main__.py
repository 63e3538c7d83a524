from kalm.cli import main

main()
