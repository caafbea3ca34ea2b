from p2pfed.cli import main

main()
