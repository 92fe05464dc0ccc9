from autotp.bench.runner import main

main()
