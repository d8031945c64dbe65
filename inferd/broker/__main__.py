from inferd.broker.process import main

main()
