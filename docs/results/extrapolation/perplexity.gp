set terminal pngcairo size 900,560 font 'sans,11'
set output '.perplexity.png.tmp'
set grid
set key outside right top
set logscale x 2
set logscale y
set xlabel 'evaluation context (tokens)'
set ylabel 'validation perplexity'
set arrow from 32, graph 0 to 32, graph 1 nohead dt 2 lc rgb 'gray'
set label 'training context' at 32, graph 0.97 offset 0.5,0 font ',9' tc rgb 'gray'
plot 'ppl_nope.dat' using 1:2 with linespoints lw 2 pt 7 title 'nope', \
     'ppl_rope.dat' using 1:2 with linespoints lw 2 pt 7 title 'rope', \
     'ppl_alibi.dat' using 1:2 with linespoints lw 2 pt 7 title 'alibi', \
     'ppl_fox.dat' using 1:2 with linespoints lw 2 pt 7 title 'fox', \
     'ppl_grape-m.dat' using 1:2 with linespoints lw 2 pt 7 title 'grape-m', \
     'ppl_grape-ap.dat' using 1:2 with linespoints lw 2 pt 7 title 'grape-ap', \
     'ppl_hdd-rope.dat' using 1:2 with linespoints lw 2 pt 7 title 'hdd-rope', \
     'ppl_tape.dat' using 1:2 with linespoints lw 2 pt 7 title 'tape'
