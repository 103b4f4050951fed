from runtime.gcs.server import main

main()
