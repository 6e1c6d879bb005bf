set terminal pngcairo size 900,560 font 'sans,11'
set output '.perplexity.png.tmp'
set grid
set key outside right top
set logscale x 2
set xlabel 'evaluation context (tokens)'
set ylabel 'validation perplexity'
plot 'ppl_rope.dat' using 1:2 with linespoints lw 2 pt 7 lc 1 title 'rope', \
     'ppl_alibi.dat' using 1:2 with linespoints lw 2 pt 7 lc 2 title 'alibi', \
     'ppl_fox.dat' using 1:2 with linespoints lw 2 pt 7 lc 3 title 'fox', \
     'ppl_grape-m.dat' using 1:2 with linespoints lw 2 pt 7 lc 4 title 'grape-m', \
     'ppl_grape-ap.dat' using 1:2 with linespoints lw 2 pt 7 lc 5 title 'grape-ap'
