from quantbridge.cli import main

main()
