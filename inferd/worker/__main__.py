from inferd.worker.process import main

main()
