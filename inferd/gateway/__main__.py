from inferd.gateway.process import main

main()
