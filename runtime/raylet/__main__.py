from runtime.raylet.server import main

main()
